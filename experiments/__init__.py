"""Thin command lines, one per job: `python -m experiments.<job> --help`."""
