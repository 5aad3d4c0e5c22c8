"""The machine a run is on: how many threads torch uses, progress bars over images, and the provenance
record (date, commit, machine) stored next to every figure."""
