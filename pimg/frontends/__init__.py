"""Front ends over the library: the command line, the web demo's backend and its subject store."""
