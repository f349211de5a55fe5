"""``meridioctl traffic``: a continuous-traffic echo server and client (after Nordix ctraffic).

``meridio.traffic.cli.traffic`` is the click group; ``core`` holds the pure accounting.
"""
