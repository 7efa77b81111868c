"""mbx: Microboxes network functions in Python."""
