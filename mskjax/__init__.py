"""mskjax."""
