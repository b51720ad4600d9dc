"""Facts about DDD17's six-channel event frames that more than one dataset needs (ddd17,
synthetic-events, and the Ev-SegNet representation of the raw-event sets): the channels and their key."""

from common.keys import Key

NUM_EVENT_CHANNELS = 6  # 0/1 positive/negative counts, 2-5 mean and std of the timestamps


def check_channels(channels):
    channels = tuple(int(c) for c in channels)
    if not channels or any(not 0 <= c < NUM_EVENT_CHANNELS for c in channels) or len(set(channels)) != len(channels):
        raise ValueError(f"channels: event channels must be distinct indices in 0..5, got {list(channels)}")
    return channels


CHANNELS = Key("channels", "data", [0, 1], "intlist", "event channels (0-5) of ddd17 / synthetic-events")
