"""Server side: the FedAvg-derived IET strategy and MSR redistribution."""
