"""Shard side: local DDPM epochs with the AGC memory bank and skip rule, TAA, skip counting."""
