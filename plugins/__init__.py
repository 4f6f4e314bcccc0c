"""Built-in ssegate plugins. Each module is one feature, written on the same hooks third-party plugins use."""
