"""An app on $TASKQ_BROKER_URL that never asks RabbitMQ's management plugin: ``taskq status
-A tests.apps.amqp_only:app`` shows what AMQP alone can tell, plugin enabled or not."""

from taskq import App

app = App(management_url="")
