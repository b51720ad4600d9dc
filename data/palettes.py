"""Class colour palettes (RGB tuples, one per class index)."""


def voc_palette(num_colours=256):
    """The PASCAL VOC palette: bits of the index spread over the high bits of R, G, B."""
    palette = []
    for index in range(num_colours):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


VOC_PALETTE = voc_palette()
# DDD17 classes: flat, construction+sky, object, nature, human, vehicle.
DDD17_PALETTE = [(128, 64, 128), (70, 130, 180), (220, 220, 0), (107, 142, 35), (220, 20, 60), (0, 0, 142)]
SYNTHETIC_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200)]
IGNORE_COLOUR = (255, 255, 255)
