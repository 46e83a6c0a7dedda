"""The ground floor: profiles and parameters, the run layout, atomic files, records, images, metrics,
figures, the named styles and the downloader. Imports nothing else from the package."""
