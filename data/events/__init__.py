"""Raw-event datasets (DSEC-Semantic, DDD17 as ESS distributes it) and event representations.

    h5.py               DSEC event files (events.h5, rectify_map.h5): windowed reads, checks, writers
    representations.py  voxel grid, per-polarity histograms, Ev-SegNet channels; windows; normalisation
    dsec.py             the `dsec-semantic` dataset
    ddd17_events.py     the `ddd17-events` dataset
    synthetic_raw.py    the embedded synthetic set written as a DSEC-format sequence (`raw_events: true`)

Nothing here imports utils/ (scripts -> utils -> data).
"""
