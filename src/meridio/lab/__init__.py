"""``meridioctl lab``: the whole system on one host, in network namespaces.

``plan`` decides (names, addresses, placement, scaling, the daemons' command lines, restart
pauses, chaos draws and verdicts; pure), ``state`` remembers (a JSON file, so every command
works from a new process), ``system`` does the host's side (namespaces, links, processes,
health, what a namespace's kernel holds), ``supervise`` is the process every role's process
runs under (restarted when it dies, as in a pod), ``lab`` puts them together, ``chaos`` kills
instances under traffic and judges what it cost, and ``cli`` is the click group.
"""
