"""Config files: one per method x data set (`get_config(arg)`); shared blocks in `common`."""
