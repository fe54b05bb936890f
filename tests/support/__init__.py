"""Helpers the tests share: photos' variants, hostile images, network namespaces, references."""
