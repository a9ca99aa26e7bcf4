"""The application: the `cprd-pipeline` command line and the demo, over the stage table (`stages`) and the
framework (`pipeline`). Nothing below this package imports it."""
