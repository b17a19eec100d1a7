"""smap-notify: Redis Pub/Sub user_noti:* to WebSocket notification daemon."""
