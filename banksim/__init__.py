"""A bank simulator: plays the banks behind txengine's channels over HTTP.

It accepts orders (`POST /v1/{channel}/collect` for top-ups, `/v1/{channel}/pay` for
withdrawals) signed with the channel's secret, answers 202 at once, and after a
configurable latency calls txengine back at the order's `callback_url` with a signed
`succeeded` or `failed`, or never (the silence rate), retrying a callback that got no
answer or a 5xx like a bank would. An order sent twice (same channel and request id) is
acknowledged again and called back once.

Run it on its own (`python -m banksim --port 8091 ...`) or start it inside a test
(`BankSimulator(...).start(port=0)`). It signs independently of txengine's own code, so
a test through it checks the wire format, not a shared helper.
"""

from banksim.simulator import BankSimulator, Order, SimConfig, dev_secrets

__all__ = ["BankSimulator", "Order", "SimConfig", "dev_secrets"]
