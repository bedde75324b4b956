"""Weights: parameter names, reference configs, files, loading, saving, export and initialisation.

    key_maps.py          reference/Mask2Former/HF parameter names <-> ours (one table each), q|k|v fusing
    reference_config.py  reference config.json + mask-config YAML <-> SegEarthR1Config (one table)
    integrity.py         cheap truncation checks of weight/state files
    files.py             a model directory's weight files, config.json and tokenizer
    pretrained.py        load_pretrained / save_pretrained
    export.py            export_reference_release (the reference layout)
    embeddings.py        [PAD]/[SEG] tokenizer set-up and embedding resizing
    initialisation.py    build_for_training from a local LLM + Mask2Former checkpoint
"""
