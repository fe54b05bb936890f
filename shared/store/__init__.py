"""The Redis structures Imbeddings keeps, one module per structure: its key names, scripts, reads and writes."""
