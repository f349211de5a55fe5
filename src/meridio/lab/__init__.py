"""``meridioctl lab``: the whole system on one host, in network namespaces.

``plan`` decides (names, addresses, placement, scaling, the daemons' command lines; pure),
``state`` remembers (a JSON file, so every command works from a new process), ``system`` does
the host's side (namespaces, links, processes, health), ``lab`` puts them together and ``cli``
is the click group.
"""
