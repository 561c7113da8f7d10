/*
 * daemon/png.h — a minimal PNG writer and a tiny RGB rasteriser for the plots
 * of `d2od eval` (internal to daemon/).
 *
 * The PNG is 8-bit RGB, non-interlaced, filter type 0 on every row, and its
 * zlib stream uses only stored (uncompressed) deflate blocks, so no library
 * is needed: the CRC-32 of each chunk and the Adler-32 of the zlib stream are
 * computed here. Files are larger than a compressing encoder's (3 bytes per
 * pixel), which is fine for plots of a few hundred thousand pixels.
 *
 * The canvas draws pixels, lines (Bresenham, with a square pen), filled
 * rectangles and text in a built-in 5x7 font (digits, letters, a little
 * punctuation; lower and upper case share glyphs). Everything clips to the
 * canvas. Single-threaded; no global state.
 */
#ifndef D2_DAEMON_PNG_H
#define D2_DAEMON_PNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct dmn_canvas {
    int w, h;
    uint8_t *rgb; /* w*h*3 bytes, row-major, owned (dmn_canvas_free) */
} dmn_canvas;

typedef struct dmn_rgb { uint8_t r, g, b; } dmn_rgb;

/* Allocates a canvas filled with bg. D2_OK, D2_EINVAL or D2_ENOMEM. */
int dmn_canvas_init(dmn_canvas *c, int w, int h, dmn_rgb bg);
void dmn_canvas_free(dmn_canvas *c); /* accepts a zeroed canvas */

void dmn_canvas_pixel(dmn_canvas *c, int x, int y, dmn_rgb col);
/* A filled rectangle [x0, x1] x [y0, y1] (inclusive, any order). */
void dmn_canvas_rect(dmn_canvas *c, int x0, int y0, int x1, int y1, dmn_rgb col);
/* A line from (x0,y0) to (x1,y1) drawn with a pen `thick` pixels wide. */
void dmn_canvas_line(dmn_canvas *c, int x0, int y0, int x1, int y1, int thick, dmn_rgb col);
/* Text with its top-left corner at (x, y); each glyph is 5x7 cells of
 * `scale` pixels with a one-cell gap. Unknown characters draw as a box.
 * Returns the width drawn in pixels. */
int dmn_canvas_text(dmn_canvas *c, int x, int y, const char *s, int scale, dmn_rgb col);
/* The width dmn_canvas_text would draw. */
int dmn_canvas_text_width(const char *s, int scale);

/* CRC-32 (ISO-HDLC, as PNG and zlib use) and Adler-32, exposed for tests. */
uint32_t dmn_crc32(uint32_t crc, const uint8_t *p, size_t n);
uint32_t dmn_adler32(uint32_t a, const uint8_t *p, size_t n);

/* Encodes 8-bit RGB pixels (w*h*3 bytes, row-major) as a PNG in a new buffer
 * (*out malloc'd, caller frees). D2_OK, D2_EINVAL or D2_ENOMEM. */
int dmn_png_encode(const uint8_t *rgb, int w, int h, uint8_t **out, size_t *len);
/* Encodes and writes to path. D2_OK, D2_EIO (logged) or an encode error. */
int dmn_png_write(const char *path, const uint8_t *rgb, int w, int h);

#endif
