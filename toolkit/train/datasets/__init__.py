"""Datasets with their own loaders: the built-in shapes (generated, no download) and CIFAR-10."""
