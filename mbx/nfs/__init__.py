"""Sample NFs: each module has ``make(**options)`` returning its NF."""
