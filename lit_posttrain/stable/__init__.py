"""Stable methods: one file each (module, DataModule, collator, losses). Import from `lit_posttrain`."""
