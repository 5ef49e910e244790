"""Recipes: the building blocks of the examples and benchmarks, built on the plug-in's public API.

The core (``skeleton``, ``pruning``, ``layers``, ``deploy``, ``measure``) never imports from here.

* :mod:`.data`: Fashion-MNIST (Debian's package) and torchvision datasets;
* :mod:`.training`: a small SGD training/evaluation loop and schedules;
* :mod:`.continual`: channel-pruning first stages (Network Slimming, Gate Decorator) and SWP training aids;
* :mod:`.baselines`: other granularities (shape-wise, stripe group lasso, MACs-matched channel pruners).
"""
