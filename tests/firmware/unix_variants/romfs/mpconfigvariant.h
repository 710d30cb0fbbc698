// The unix port as a board with a ROMFS partition: the standard variant plus vfs.rom_ioctl, whose
// one segment is the image file named by $MICROPY_ROMFS_IMAGE, mapped read-only outside the GC heap
// (the patch tests/firmware/vendored_port.py applies to ports/unix/main.c), and mounted at /rom at
// start-up the way a board's boot code mounts its partition.
#define MICROPY_CONFIG_ROM_LEVEL (MICROPY_CONFIG_ROM_LEVEL_EXTRA_FEATURES)

#include "../mpconfigvariant_common.h"

#undef MICROPY_VFS_ROM_IOCTL
#define MICROPY_VFS_ROM_IOCTL (1)
