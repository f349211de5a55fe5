"""Conduits without Network Service Mesh: the connect service and its mechanisms.

An *endpoint* (the LB for proxies, the proxy for targets) serves ``meridio.connect.v1.Connect``;
a *client* requests a connection, refreshes it, and closes it. The link between them is made by
a mechanism: ``veth`` (one host: the endpoint creates the pair and puts the client's end into the
client's namespace) or ``vxlan`` (hosts on a primary network: each side makes its own VXLAN
interface toward the other's primary address, with a VNI they agree on).

* :mod:`meridio.connect.endpoint`: the servicer and the endpoint's reconcile of its links;
* :mod:`meridio.connect.client`: requests, refreshes and the client's end of each link;
* :mod:`meridio.connect.kernel`: the link operations both sides share;
* :mod:`meridio.connect.lbside`: the LB's endpoint and its FRONTEND announcement in NSP.

What a request means (validation, names, VNIs, MTUs) is pure and lives in
:mod:`meridio.core.conduit`.
"""
