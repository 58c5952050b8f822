"""BackData: delivers the event queue to the customer's webhook.

Consumes ``EVENT_QUEUE`` (global ``backdata.queue-name``); POSTs batches as JSON arrays to
``backdata.post-url``, retries for ``max-age-seconds``, then dead-letters to ``EVENT_QUEUE:dead``
(``backdata replay`` puts them back).  Optionally feeds the bounce manager (original §3.4).
"""

SERVICE = "backdata"
