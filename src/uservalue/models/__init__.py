"""Every model behind one interface (base.ValueModel), looked up by name in catalog."""
