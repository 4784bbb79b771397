"""``make bench``: the proxy measured side by side with Triton's ensemble and the seed's design.

Everything runs here, on loopback, against the embedded Triton; figures are reported as ratios
to references measured in the same run (absolute figures drift on a shared machine).
"""
