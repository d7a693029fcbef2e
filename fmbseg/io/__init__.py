"""File and network I/O shared by the stages."""
