# The standard variant with a ROMFS segment (mpconfigvariant.h); no frozen firmware.
