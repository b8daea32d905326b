"""End-to-end experiments built from the library: the demos, the reasoning benchmark and the
paper-table generator. Nothing below this package imports it."""
