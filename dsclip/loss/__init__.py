"""Contrastive losses (CLIP, SigLIP) over all ranks, and the collectives they and ZeRO run on."""
