"""Runtime backends behind one small interface (see `base.UNetRunner`)."""
