"""The bundled demo: a generated shapes corpus, tiny models trained by this package, and `cprd-pipeline demo`."""
