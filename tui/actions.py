"""What the operator can do: one table of actions (keys, titles, help) that the main screen's
bindings, the help overlay and the command palette are all made from. The actions themselves are
in `tui.operator`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ACTIONS",
    "BURSTS",
    "DEGRADE_FACTORS",
    "OPERATOR_ACTIONS",
    "RATE_STEP",
    "REPLAY_ACTIONS",
    "REPLAY_CONTROLS",
    "SEEK_STEP_S",
    "SPEEDS",
    "ActionSpec",
]

#: Speeds that `>` and `<` step through (x real time).
SPEEDS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
#: `+` multiplies the arrival rate by this, `-` divides by it.
RATE_STEP = 1.25
#: Bandwidth factors offered when degrading a link.
DEGRADE_FACTORS = (0.5, 0.25, 0.1, 0.01)
#: Bursts offered: (factor, duration in simulated seconds).
BURSTS = ((2.0, 30.0), (5.0, 10.0), (10.0, 5.0))
#: `[` and `]` jump this many simulated seconds in a replay.
SEEK_STEP_S = 10.0


@dataclass(frozen=True, slots=True)
class ActionSpec:
    action: str  # the main screen's action (method action_<action>)
    keys: str  # Textual key names, comma-separated
    key_display: str
    title: str  # footer and palette
    help: str  # help overlay and palette
    changes_twin: bool = True
    footer: bool = False


# fmt: off
ACTIONS: tuple[ActionSpec, ...] = (
    # action, keys, key shown, title, help, changes the twin, in the footer
    ActionSpec("fail_chip", "f", "f", "Fail chip",
               "Fail the selected chip (asks first): its instance goes down", footer=True),
    ActionSpec("fail_instance", "F", "F", "Fail instance",
               "Fail every chip of the selected instance (asks first)"),
    ActionSpec("recover_chip", "r", "r", "Recover",
               "Bring the selected chip back into service", footer=True),
    ActionSpec("recover_instance", "R", "R", "Recover instance",
               "Bring every chip of the selected instance back into service"),
    ActionSpec("drain_chip", "d", "d", "Drain",
               "Drain the selected chip's instance: no new work, running requests finish",
               footer=True),
    ActionSpec("drain_instance", "D", "D", "Drain instance", "Drain the selected instance"),
    ActionSpec("degrade_link", "l", "l", "Degrade link",
               "Pick a KV link and cut its bandwidth", footer=True),
    ActionSpec("restore_link", "L", "L", "Restore link",
               "Pick a degraded KV link; restore its bandwidth"),
    ActionSpec("rate_up", "plus,equals_sign", "+", "Rate+",
               f"Raise the arrival rate x{RATE_STEP:g}", footer=True),
    ActionSpec("rate_down", "minus", "-", "Rate-",
               f"Lower the arrival rate /{RATE_STEP:g}", footer=True),
    ActionSpec("set_rate", "a", "a", "Set rate", "Type an arrival rate in requests/s"),
    ActionSpec("burst", "b", "b", "Burst", "A burst of arrivals: pick its factor and length"),
    ActionSpec("routing", "p", "p", "Routing",
               "Pick the routing policy (weighted asks for weights)", footer=True),
    ActionSpec("weights", "w", "w", "Weights", "Weighted routing: set each tier's share"),
    ActionSpec("toggle_pause", "space", "space", "Pause", "Pause or resume the twin",
               footer=True),
    ActionSpec("speed_up", "greater_than_sign", ">", "Faster",
               "Run faster (x real time, up to 1000x)", footer=True),
    ActionSpec("speed_down", "less_than_sign", "<", "Slower", "Run slower", footer=True),
    ActionSpec("zoom", "z", "z", "Zoom",
               "Zoom the focused panel to the whole screen (again: back)", changes_twin=False),
)
# fmt: on

#: The actions that change the twin (hidden and refused in read-only mode).
OPERATOR_ACTIONS = frozenset(a.action for a in ACTIONS if a.changes_twin)

#: Replay only (`fleet-twin tui --replay`): seeking in the recording. They change nothing.
# fmt: off
REPLAY_ACTIONS: tuple[ActionSpec, ...] = (
    ActionSpec("seek_back", "left_square_bracket", "[", "Back",
               f"Replay: jump back {SEEK_STEP_S:g} simulated seconds", changes_twin=False,
               footer=True),
    ActionSpec("seek_forward", "right_square_bracket", "]", "Forward",
               f"Replay: jump forward {SEEK_STEP_S:g} simulated seconds", changes_twin=False,
               footer=True),
    ActionSpec("seek_to", "g", "g", "Seek to...",
               "Replay: jump to a simulated time (seconds or h:mm:ss)", changes_twin=False),
)
# fmt: on

#: The actions that change the twin but work on a replay (they act on the playback).
REPLAY_CONTROLS = frozenset({"toggle_pause", "speed_up", "speed_down"})
