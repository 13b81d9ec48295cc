"""The operator console: a web page at /console behind the admin credential (docs/console.md)."""
