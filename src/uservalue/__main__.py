"""`python -m uservalue`: the CLI with this interpreter (what Airflow tasks run)."""

from uservalue.cli.app import app

app(prog_name="uservalue")
