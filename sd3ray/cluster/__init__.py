"""Ray: joining or starting a cluster (`connect`), the Ray Train trainer (`trainer`) and what runs on each worker
(`worker`), and Ray Data for streamed sets (`ray_data`).
"""
