"""Dataset plugins (one file each, read from the released layouts) and the shared image pipeline."""
