"""Stage drivers: ConfigDict -> settings -> library -> artifacts."""
