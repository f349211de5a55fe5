"""``python -m meridio.traffic``: the ``meridioctl traffic`` group on its own."""

from meridio.traffic.cli import traffic

if __name__ == "__main__":
    traffic(prog_name="meridioctl traffic")
