"""The admin listener: probes, Prometheus metrics, the admin API and the dashboard.

:func:`txgateway.admin.resource.admin_site` builds it on a
:class:`~txgateway.control.GatewayControl` (the running ``GatewayService``).
"""
