"""Examples of customizing IET-AGC+ without editing the package."""
