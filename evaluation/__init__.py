"""Server-side evaluation: MQ (nearest-neighbour memorization count), FID, grids and reports."""
