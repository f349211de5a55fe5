"""meridio: attract external traffic to VIPs and spread it over targets with Maglev."""

__version__ = "0.1.0"
