"""Experiments around the chain, not part of it: the paper's toy experiment (section 3.1), the demo job,
the reproduction on VOC / COCO, the seed-quality table, the stage study and the tuning of a new data set."""
