"""Collectives: schedules (the IR), the algorithms that build them, their costs, and the runtime."""
