"""Publishing: per-tile results to archive-ready catalogs, images, HiPS and MOC."""
