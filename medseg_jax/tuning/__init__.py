"""Tools built on training: the scaling study and the GreScale guideline tuner."""
