"""Facts about event frames that more than one dataset needs (DDD17, synthetic-events).

Kept apart from data/ddd17.py so that importing the data package does not import the module that
`python -m data.ddd17` runs.
"""

NUM_EVENT_CHANNELS = 6  # 0/1 positive/negative counts, 2-5 mean and std of the timestamps


def check_channels(channels):
    channels = tuple(int(c) for c in channels)
    if not channels or any(not 0 <= c < NUM_EVENT_CHANNELS for c in channels) or len(set(channels)) != len(channels):
        raise ValueError(f"channels: event channels must be distinct indices in 0..5, got {list(channels)}")
    return channels
